"""Attack simulators on the logprob channel, run against the guard in front of real vLLM."""
