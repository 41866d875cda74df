"""``python -m train``: make a stream model in the paper's format from a Llama-family folder.

``tasks`` (the data, made by a program), ``render`` (an example as a grid or as one
stream), ``model`` (channel embedding + LoRA on a transformers decoder), ``loop``
(seeded, resumable training), ``export`` (the adapter folder), ``evaluate`` (greedy
answers through the engine). See train/README.md.
"""
