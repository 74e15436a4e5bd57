"""Tools around the bridge: a simulated caller, a load generator and the embedded Savants emulator."""
