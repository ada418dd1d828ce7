"""The conversation stage's model parts: the ``conversation:`` block (config), the samples and
prompts (prompt: the <movie> slot, the retrieved prompt), the simulated responses of the memory
store (memory) and the causal LM that writes replies (decoder)."""
