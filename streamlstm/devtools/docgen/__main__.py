"""``python -m streamlstm.devtools.docgen [--check] [--docs DIR]``."""

import sys

from streamlstm.devtools.docgen import main

sys.exit(main())
