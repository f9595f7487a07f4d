"""How sites and the server talk in a round, whatever carries the messages.

A :class:`~securefed.protocol.link.Link` delivers one stage's payloads to sites and returns
their replies (in-process: :class:`~securefed.protocol.link.LocalLink`; over Flower:
:class:`securefed.deploy.flower_link.FlowerLink`). A secure-sum mode
(:mod:`securefed.protocol.modes`) is the one driver of its protocol over any link: a site
side that protects an update and answers protocol stages, and a server side that collects
the protected updates into their sum. Nothing here imports torch.
"""
