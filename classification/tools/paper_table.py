"""Print the paper's model tables next to the parameters and FLOPs measured in this repository.

Same as `python classification/tools/get_flops.py --paper-table`.

Example:
    python classification/tools/paper_table.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from get_flops import paper_table  # noqa: E402

if __name__ == '__main__':
    print(paper_table())
