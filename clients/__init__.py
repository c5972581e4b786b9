"""The Flower ClientApp: a thin adapter from Flower messages to `fedgen.rounds`."""
