"""The device core: network and local-update configs, networks, the local update and the memory meter. Imports torch and numpy only, nothing else of the server."""
