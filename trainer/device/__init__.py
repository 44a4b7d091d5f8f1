"""The device core: network and local-update configs, networks, the local update, the memory
meter and the cost meter. Imports torch and numpy, nothing else of the server."""
