"""fedgen: federated, differentially private training of image generative models.

The library (config, data, models, privacy, training, rounds, reports) does not import
Flower; the Flower apps in `clients/` and `server/` adapt it."""

__version__ = "0.1.0"
