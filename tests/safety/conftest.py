import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the corpus and reference helpers beside the tests
