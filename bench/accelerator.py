"""Step, gradient, optimizer and forward times of the `train/bert.py` classifier on whatever
backend JAX has; what is measured and how: `support.accelerator`.

    python -m bench.accelerator                       # BERT-base shape (minutes on a GPU)
    python -m bench.accelerator --torch-full-ms 38.3 --json accel.jsonl
    python -m bench.accelerator --small               # tiny config, a CPU smoke run
"""

import sys

from support.accelerator import main

if __name__ == "__main__":
    main(sys.argv[1:])
