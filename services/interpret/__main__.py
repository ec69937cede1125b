from kinema.rpc.server import serve
from services.interpret.server import build_server

serve(build_server)
