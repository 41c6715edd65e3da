"""CodeGPT's foundation: the model, tokenizer, recipes, checkpoints, data, training loop and generation."""
