"""The Flower ServerApp and strategy glue: a thin adapter around `fedgen.rounds`."""
