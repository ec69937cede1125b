from kinema.rpc.server import serve
from services.denoiser.server import build_server

serve(build_server)
