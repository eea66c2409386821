"""Re-ID at equal compute, three seeds per backbone (issue 18); see run.py."""
