"""Suite-wide settings: single-threaded math so that tests and background processes share the
two cores predictably."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
