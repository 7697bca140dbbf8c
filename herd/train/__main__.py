"""`python -m herd.train CONFIG.toml [--section.field VALUE ...]`: one worker (torchrun starts one per rank)."""
from herd.train.launch import worker_main

if __name__ == "__main__":
    worker_main()
