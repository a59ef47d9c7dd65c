"""`python -m finetune` (and `accelerate launch -m finetune train ...`)."""

from finetune.cli import main

if __name__ == "__main__":
    main()
