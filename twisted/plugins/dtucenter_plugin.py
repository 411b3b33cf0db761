from twisted.application.service import ServiceMaker

dtucenter = ServiceMaker(
    "dtucenter",
    "dtucenter.tap",
    "Data center for DTUs: DTU protocol, Modbus bridge, store and HTTP API",
    "dtucenter",
)
