"""Flower: the ServerApp (server) and ClientApp (client) around the round driver and the device core."""
