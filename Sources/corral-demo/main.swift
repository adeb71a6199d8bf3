print("corral-demo")
