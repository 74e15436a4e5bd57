import sys

from telephony_bridge.cli import main

sys.exit(main())
