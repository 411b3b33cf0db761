"""GET /api/templates: the meter templates a meter can be made from.

For now the ones shipped with the center (``dtucenter/modbus/templates/``), the same
for every account; accounts' own templates come with devices kept in the database.
"""

from __future__ import annotations

from typing import Any

from dtucenter.modbus.templates import shipped_templates
from dtucenter.store.recorder import point_spec
from dtucenter.web.router import ApiError, Call, Router


class TemplateApi:
    def install(self, router: Router) -> None:
        router.add("GET", "/api/templates", self.list_templates)
        router.add("GET", "/api/templates/{name}", self.get_template)

    async def list_templates(self, call: Call) -> Any:
        call.query(())
        return {"templates": [template.summary() for template in shipped_templates().values()]}

    async def get_template(self, call: Call, name: str) -> Any:
        call.query(())
        template = shipped_templates().get(name)
        if template is None:
            raise ApiError(404, f"no template {name!r}")
        return {**template.summary(), "points": [point_spec(point) for point in template.points]}
