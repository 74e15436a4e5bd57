"""The AI side: the Savants Voice API session (sans-I/O), the token endpoint and the WebSocket driver."""
