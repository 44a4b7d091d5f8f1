"""Server side: networks, data sets, federated simulation, evaluation, costs, coordinator."""
