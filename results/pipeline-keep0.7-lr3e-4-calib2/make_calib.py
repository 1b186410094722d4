"""Another calibration sample of the pipeline's size (32 x 256 tokens): WikiText-2 valid from token
START on (the default sample is tokens 0-8 191), as bench/transfer.py's calib_skip.

    python make_calib.py OUT.raw [START]      # START: 8192 (the default here) or 16384, ...
"""
import sys
from pathlib import Path

from gradot.modeling import load_model
from gradot.stats.calib import default_calibration_path, read_corpus

start_token = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
_, tok = load_model("default")
text = read_corpus(default_calibration_path())
enc = tok(text[:400_000], add_special_tokens=False, return_offsets_mapping=True)
start = enc["offset_mapping"][start_token][0]
Path(sys.argv[1]).write_text(text[start:start + 80_000], encoding="utf-8")
print(f"token {start_token} starts at character {start}")
