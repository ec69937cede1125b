from kinema.rpc.server import serve
from services.depth.server import build_server

serve(build_server)
