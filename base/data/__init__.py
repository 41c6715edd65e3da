"""Pretraining data: documents from a corpus (`corpus`), filtered and tokenized into token shards
(`shards`, built by `build`), read back as training batches (`loader`), optionally rearranged
for fill-in-the-middle as they are read (`fim`)."""
