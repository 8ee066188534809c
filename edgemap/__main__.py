"""``python -m edgemap`` (also what ``torchrun -m edgemap finetune ...`` runs)."""

from edgemap.cli import main

if __name__ == "__main__":
    main()
