"""The caller side: Twilio Media Streams messages, signatures, TwiML and webhooks."""
