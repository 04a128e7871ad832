"""train/llama.py against transformers on the real SmolLM2-135M-Instruct GGUF; what is compared
and how: `support.llama_crosscheck`.

    python -m bench.llama_crosscheck             # prints the figures; --json PATH writes them too
"""

import sys

from support.llama_crosscheck import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
