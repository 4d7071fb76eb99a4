"""Dataset components: decoding, layouts, buckets, conversations and batch sampling."""
