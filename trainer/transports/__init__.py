"""Transports move round messages and decide nothing: in-process simulation, the HTTP coordinator, Flower."""
