"""The lab on a real chat model, SmolLM2-135M-Instruct (docs/evaluation.md, "On a real model")."""
