"""The request pipeline: authenticate → validate → tier policy → score → plan → admit →
rewrite (the defences' request halves) → (upstream) → transform (their response halves) →
record and audit. Each stage is a small function over one ``RequestContext``; from the plan
on, every stage reads the request's one immutable ``Plan``."""
