"""Shared pieces of the four Kandinsky 2.2 fine-tuning scripts (one module per concern)."""
import warnings

# Importing paddle warns when ccache (used to compile custom operators, which these scripts never do) is missing:
# noise in front of every run's output and every one-line error.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")
