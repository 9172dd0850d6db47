"""What runs on a serving VM (the bundle ``fab deploy`` ships): model and adapter fetches
from Blob, host files, the EXAONE remote-code patch, the health gate. Imports only ``stack``,
``adapters`` and ``serving.atomic``; never ``render``, ``plan``, ``bench`` or ``local``."""
