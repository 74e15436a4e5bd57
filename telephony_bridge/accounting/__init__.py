"""Device accounting: which Savants device serves which call, within Savants' per-device limits.

``base`` holds the contract, ``memory`` and ``redis`` the two backends, ``factory`` picks one from settings.
"""
