"""Language-model text features: verbalise items and users, encode them offline, fine-tune with LoRA.

Modules (import what you need; nothing here loads a model at import time):

- :mod:`components.text.verbalise` — items and users as sentences from metadata and the KG.
- :mod:`components.text.pairs` — (user history text, next item) pairs from training interactions.
- :mod:`components.text.encoder` — model resolution, mean-pooled sentence embeddings, embedding cache.
- :mod:`components.text.finetune` — parameter-efficient (LoRA) contrastive fine-tuning.
- :mod:`components.text.features` — item/user embedding helpers (cold start included) and persistence.
"""
