# A second calibration sample of the pipeline's size: WikiText-2 valid from its 8 193rd token on
# (the default sample is tokens 0-8 191), as bench/transfer.py's calib_skip=32.
import sys
from pathlib import Path
from gradot.modeling import load_model
from gradot.stats.calib import default_calibration_path, read_corpus
_, tok = load_model("default")
text = read_corpus(default_calibration_path())
enc = tok(text[:200_000], add_special_tokens=False, return_offsets_mapping=True)
start = enc["offset_mapping"][8192][0]
Path(sys.argv[1]).write_text(text[start:start + 80_000], encoding="utf-8")
print(start)
