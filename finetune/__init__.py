"""finetune: fine-tune a causal language model with one command.

import finetune
finetune.train("sample_data/recipes.txt", model="tiny")
finetune.generate("Title:", run="recipes", n=3)
"""

from finetune.api import evaluate, export, generate, prepare, train
from finetune.errors import FinetuneError

__all__ = ["train", "generate", "evaluate", "export", "prepare", "FinetuneError"]
__version__ = "0.1.0"
