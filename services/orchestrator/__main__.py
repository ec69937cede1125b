from kinema.rpc.server import serve
from services.orchestrator.server import build_server

serve(build_server)
