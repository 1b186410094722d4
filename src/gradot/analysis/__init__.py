"""Analysis of emulators: the gradient proxy (``proxy``), accuracy and loss transfer (``transfer``),
privacy measures (``privacy``), training-free compensation (``compensate``), and an attacker's
healing (``healing``) with the audit built on it (``audit``)."""
