"""Lab: the bundled teacher's training, its evaluation, and distillation experiments."""
