"""telephony-bridge: Twilio Media Streams <-> Savants Voice AI."""

__version__ = "0.1.0"
