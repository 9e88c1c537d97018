"""lpm: Large Population Models — tensor agents whose decisions come from a locally served LLM.

The public API is what this module lists in ``__all__``; everything else is internal.
"""

from lpm.archetype import ArchetypeSpec as ArchetypeSpec
from lpm.archetype import Grouping as Grouping
from lpm.errors import LpmError as LpmError
from lpm.population import Population as Population

__version__ = "0.1.0"

__all__ = ["ArchetypeSpec", "Grouping", "LpmError", "Population"]
