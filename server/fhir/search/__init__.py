"""FHIR R4 search (http://hl7.org/fhir/R4/search.html) and the conditional interactions.

- parameters.py: the R4 SearchParameter definitions per resource type, plus custom ones
- fhirpath.py:   their FHIRPath expressions compiled into fast extractors
- terms.py:      the search terms stored with each resource (the write path's indexer)
- query.py:      a request parsed into a typed query
- compile.py:    the typed query compiled into a MongoDB filter
- service.py:    running a search: paging, includes, _summary/_elements, explain, Bundle
- conditional.py: conditional create/update/delete and transaction entries
- custom.py:     custom SearchParameter resources, $reindex and type/system $meta
- search_routes.py: requests to searches for the routes in server/fhir/routes.py
- capabilities.py, terminology.py, ucum.py: CapabilityStatement claims, the seam for
  terminology-backed modifiers, UCUM canonical units

Importing this package joins search to the write path (`HOOKS.index`) and registers its
CapabilityStatement contributions.
"""

from __future__ import annotations

from server.fhir import capability, interactions
from server.fhir.search import capabilities, custom, terms

interactions.HOOKS.index = terms.index
if custom.after_write not in interactions.HOOKS.after_write:
    interactions.HOOKS.after_write.append(custom.after_write)
capability.RESOURCE_EXTRAS["search"] = capabilities.resource_search
capability.FEATURES.update(capabilities.FEATURES)
