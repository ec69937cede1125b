from kinema.rpc.server import serve
from services.distill.server import build_server

serve(build_server)
