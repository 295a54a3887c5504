"""moec's logger, registered with torch._logging so TORCH_LOGS="moec" / "+moec" control it."""
import logging

import torch._logging

log = logging.getLogger("moec")
try:
    torch._logging._internal.register_log("moec", "moec")
except Exception:  # registered already (re-import) or a torch without the registry: plain logging
    pass
