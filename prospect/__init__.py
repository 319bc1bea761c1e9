"""prospect: LoRA fine-tuning (SFT and KTO) from one YAML file, on one machine or a Ray cluster.

Keep this module light: `import prospect` must not import torch, transformers or datasets.
"""

__version__ = "0.1.0"
