"""The request pipeline: authenticate → validate → apply the tier policy → rewrite → (upstream)
→ transform → record. Each stage is a small function over one ``RequestContext``."""
