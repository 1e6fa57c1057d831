"""The trainer's domain: plain Python, no gRPC or protobuf types.

Sub-packages: ``engine`` (LoRA training, DP-SGD and accounting on torch), ``datasets``
(server-held encrypted datasets and Poisson-sampled runs), ``audit`` (the empirical
privacy audit); modules: ``service`` (the API's use cases), ``ledger`` (epsilon),
``jobs`` (job kinds, messages, ``tensafe://`` paths).
"""
