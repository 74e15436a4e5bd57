"""Audio for one call, pure and synchronous: μ-law codec, 2× resamplers, the inbound timeline.

No I/O and no asyncio here; the bridge feeds bytes in and sends what comes out.
"""
